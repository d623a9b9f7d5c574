"""The Slurm target: one heterogeneous job per deployment.

backend    the Backend: find the deployment's jobs, submit, wait ready, cancel
cli        argv builders and output parsers of sbatch/squeue/scontrol/scancel (pure)
"""
