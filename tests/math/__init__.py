"""Layer 1 tests: spd_math against docs/math.md, golden vectors and textbook definitions."""
