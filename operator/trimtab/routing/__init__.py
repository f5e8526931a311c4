"""How traffic is split between a stable and a candidate revision: a TrafficRouter protocol
and one router per mesh (Gateway API, Istio) or none (replica ratio)."""
