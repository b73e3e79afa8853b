"""The cost planner: which hardware, where, spot or on demand, and what a run will cost.

Modules, arrows one way (each imports only those above it; tests/plan/test_layout.py holds it):
  hardware     GPU peak FLOP/s and memory
  errors       PlanError
  catalog      SkyPilot's catalog files, zone by zone
  offers       zones -> region offers (median, outliers, Local Zones)
  clouds       enabled clouds (what `sky check` recorded)
  egress       cross-cloud traffic and its price
  tokens       tokens a run trains on
  throughput   tokens/s per GPU type
  memory       does the model fit (the preflight uses it too)
  checkpoint   size, time, Young/Daly's interval
  spot         the spot model: expected billed time; RELAUNCH_MINUTES
  result       what a plan says: GpuOption, Offer, Plan (and its JSON)
  planner      all of it -> a Plan (ranked offers, the seed explained, JSON)
  render       the Plan as rich tables
Nothing here imports from vicuna_sky.launch; the launcher imports the planner.
"""

from vicuna_sky.plan.errors import PlanError
from vicuna_sky.plan.planner import make_plan
from vicuna_sky.plan.result import Offer, Plan

__all__ = ["Offer", "Plan", "PlanError", "make_plan"]
