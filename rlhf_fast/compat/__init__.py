"""Classes with other libraries' signatures, computed by rlhf_fast's ops, so that switching is one
import line: ``rlhf_fast.compat.liger`` (Liger-Kernel's fused losses). They never import the
library they imitate."""
