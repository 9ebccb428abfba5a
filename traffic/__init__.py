"""Traffic: the simulator (open and closed loop), dataset replays and recordings."""
