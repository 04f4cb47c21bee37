"""ShotStream cache package."""
