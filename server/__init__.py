"""ShotStream server package."""
