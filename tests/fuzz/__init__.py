"""The fuzz harness shared by tests/test_fuzz.py (fast profile) and tools/fuzz.py (long profile): model,
data, rule and table strategies (models.py, inputs.py), the case families (cases.py), and the runner that
checks DESIGN.md's promises on each case (harness.py)."""
