"""One scheduler for VMs and containers (DESIGN.md, Compute): filters, then
weights, then a reservation claim. ``placement`` is pure and in-memory (fast,
testable with fake nodes); ``claims`` makes a choice stick in the database."""
