"""cairn-agent: the node agent (KubeVirt's virt-handler): registration with
inventory, heartbeats, and the reconcile loop later layers plug into."""
