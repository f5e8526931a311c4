"""The NVML GPU agent: per-pod GPU memory and utilization on /metrics, for right-sizing and
training diagnosis."""
