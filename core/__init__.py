"""The foundation: settings, Kafka helpers, metrics and CLI helpers. It imports nothing of ours."""
