"""Diagnostics: run the benchmark under an explicitly started MPS daemon and keep its logs."""
import os, shutil, subprocess, sys, threading, time
from deep_ep.testing import MpsDaemon

out = os.environ.get("OUT", "/tmp")
with MpsDaemon() as d:
    print("pipe", d.pipe_dir, flush=True)
    def snap():
        time.sleep(25)
        with open(os.path.join(out, "smi.txt"), "w") as f:
            f.write(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
            r = subprocess.run(["nvidia-cuda-mps-control"], input="get_server_list\n", capture_output=True, text=True)
            f.write("server list: " + r.stdout + r.stderr)
    threading.Thread(target=snap, daemon=True).start()
    for ranks in sys.argv[1:]:
        subprocess.run([sys.executable, "-m", "deep_ep.bench", "--num-ranks", ranks, "--iters", "5", "--sweep"], check=False)
    for name in os.listdir(d.log_dir):
        shutil.copy(os.path.join(d.log_dir, name), os.path.join(out, "mps_" + name))
