from django.core.management.base import BaseCommand

from diagnosis.services.images import requeue_stale_images


class Command(BaseCommand):
    help = "Return dead claims to the queue and enqueue uploads whose message was lost (the sweeper, once)."

    def handle(self, *args, **options):
        counts = requeue_stale_images()
        self.stdout.write(
            f"{counts['reclaimed']} dead claims returned, {counts['requeued']} images enqueued again, "
            f"{counts['explanations']} explanations enqueued again."
        )
