"""IronFleet edge agent: durable buffering, replay and uplink of vehicle telemetry."""
