"""IronFleet firmware bridge: the serial protocol between onboard controllers and the agent."""
