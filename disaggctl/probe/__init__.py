"""GPU topology probe: what NVML (or nvidia-smi) and sysfs say about each host.

- agent.py (+ fields, sysfs, smi_xml, smi_topo, smi_text, nvml): the standard-library program
  shipped to each host (bundle.py makes it one file for `python3 -`);
- remote.py: runs it over SSH on many hosts in parallel, or on this machine;
- captures.py: recorded nvidia-smi output -> HostTopology (`disaggctl topology`);
- checks.py: `detect_problems`, what placement must avoid; summary.py: the rich tables.
"""
