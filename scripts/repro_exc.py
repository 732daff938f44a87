import faulthandler, sys, tempfile
faulthandler.enable()
import torch
import deep_ep
from deep_ep import _C
print("A: make_view dtype error"); sys.stdout.flush()
try: _C.make_view(0, 'float16', [1],[1],0)
except TypeError as e: print('ok TypeError', e)
print("B: Config error"); sys.stdout.flush()
try: _C.Config(7)
except ValueError as e: print('ok ValueError', e)
d = tempfile.mkdtemp()
g = _C.FileGroup(d, 0, 1, 5.0)
b = deep_ep.Buffer(g, num_nvl_bytes=1<<20, explicitly_destroy=True)
print("C: layout good"); sys.stdout.flush()
t = torch.zeros(4, 2, dtype=torch.int64, device='cuda')
b.get_dispatch_layout(t, 8)
print("D: layout bad dtype"); sys.stdout.flush()
try: b.get_dispatch_layout(t.int(), 8)
except TypeError as e: print('ok TypeError', e)
print("E: done")
