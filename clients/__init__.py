"""ShotStream clients package."""
