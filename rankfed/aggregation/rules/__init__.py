"""The aggregation rules as pure batch functions (float64 reference implementations)."""
