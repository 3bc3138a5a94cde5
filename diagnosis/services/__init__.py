"""Business logic as keyword-only functions. Views, serializers, tasks and commands call these."""
