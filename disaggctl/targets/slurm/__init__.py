"""The Slurm target: one heterogeneous job per deployment.

backend    the Backend: find the deployment's jobs, submit, wait ready, cancel
access     how HTTP reaches the job's processes (from here, or from the login host over SSH) and
           `status --check` on a job
cli        argv builders and output parsers of sbatch/squeue/scontrol/scancel (pure)
"""
