"""`ember optimize`: a workload and an objective in, a measured quality/latency/cost Pareto front and a
DeploymentSpec out.

workload (the requests) + objective (constraints and a goal) -> space (the config schema's searchable
settings) -> profile (this machine's step costs, cached) -> simulate (the real scheduler on a simulated
clock) -> search (predict all, replay the promising) -> replay (the real server) -> report.
"""
