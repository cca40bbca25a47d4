"""Runs a command (its stdout discarded) and writes its peak RSS in MB to a file, from the
kernel's accounting of the finished child; exits with the command's status.

    python3 benches/peak_rss.py OUT_FILE COMMAND [ARGS...]
"""
import resource
import subprocess
import sys

code = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL).returncode
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
sys.exit(code)
