from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from diagnosis.services.tokens import create_api_token


class Command(BaseCommand):
    help = "Create a named API token for a user and print it once (only a digest is stored)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="api", help="What the token is for, e.g. 'hospital-pacs'.")
        lifetime = parser.add_mutually_exclusive_group()
        lifetime.add_argument(
            "--expires-days", type=int, default=-1, help="Lifetime in days (default: API_TOKEN_TTL_DAYS)."
        )
        lifetime.add_argument("--no-expiry", action="store_true", help="A token that never expires.")

    def handle(self, *args, **options):
        try:
            user = get_user_model().objects.get(username=options["username"])
        except get_user_model().DoesNotExist:
            raise CommandError(f"No user named {options['username']!r}.") from None
        try:
            token, plain = create_api_token(
                user=user,
                name=options["name"],
                expires_in_days=None if options["no_expiry"] else options["expires_days"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        expiry = token.expiry.isoformat() if token.expiry else "never"
        self.stderr.write(f"Token {token.name!r} for {user.username}, expires {expiry}. It is shown only once:")
        self.stdout.write(plain)
