"""Tropical inside orchestrators: Ray Serve (:mod:`tropical_sched.integrations.ray_serve`, needs the ``ray`` extra),
over the engine-agnostic replica routing of :mod:`tropical_sched.integrations.replica_routing`."""
