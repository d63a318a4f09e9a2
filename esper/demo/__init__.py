"""`esper demo`: the whole pipeline and a network that grows, on one machine."""
