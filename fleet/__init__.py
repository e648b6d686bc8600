"""The fleet side: the reference collector (SQLite or PostgreSQL), its MQTT subscriber,
the import of bundles carried home, and the demo. It depends on `agent` for the fleet
protocol (`agent.fleet`, `agent.fleet_auth`) and the resilience core; nothing in `agent`
or `firmware_bridge` imports it."""
