"""ShotStream model package."""
