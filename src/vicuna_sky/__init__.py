"""vicuna-sky: the Vicuna system, SkyPilot-first and cost-optimized."""

__version__ = "0.1.0"
