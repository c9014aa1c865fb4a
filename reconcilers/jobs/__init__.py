"""VmJob protocol: envelope, typed versioned payloads, validation, builder, engine."""
