"""The lab cluster: several Cairn nodes on one machine, each in its own network, mount
and UTS namespace and its own cgroup, on an underlay bridge that lives in a namespace
of its own. Nodes can be killed, partitioned and healed; HA and replication are tested
this way (DESIGN.md, Modes)."""
