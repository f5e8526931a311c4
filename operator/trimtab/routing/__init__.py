"""How traffic is split between a ModelDeployment's stable and candidate revisions: the
TrafficRouter protocol, one router per mesh, and the registry keyed by router type."""
