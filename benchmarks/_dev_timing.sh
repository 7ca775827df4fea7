set -e
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
python3 -c "
import sys; sys.path.insert(0,'benchmarks')
from pathlib import Path
import bench_blend as bb
bb.make_adapter(Path('/tmp/b/a16'),16,32,1); bb.make_adapter(Path('/tmp/b/b8'),8,16,2)
"
python3 -c "import numpy" ; python3 -c "import numpy"
for i in 1 2 3 4 5; do
  /usr/bin/time -f "cli 2 cores %e s" taskset -c 0,1 python3 -m lora_tools blend /tmp/b/a16 /tmp/b/b8 --weight 0.5 --method svd --rank 16 -o /tmp/b/out --force --json > /dev/null
done
/usr/bin/time -f "python -c pass %e s" taskset -c 0,1 python3 -c pass
/usr/bin/time -f "import numpy %e s" taskset -c 0,1 python3 -c "import numpy"
/usr/bin/time -f "dense ties on GPU (1B) %e s" python3 -m lora_tools blend /tmp/b/a16 /tmp/b/b8 --weight 0.5 --method ties --density 0.5 --rank 16 -o /tmp/b/ties --force --json > /tmp/b/ties.json
python3 -c "import json; d=json.load(open('/tmp/b/ties.json')); print('ties gpu', d['device'], d['seconds'], 'energy', d['energy_kept'], d['min_energy_kept'])"
python3 -m pytest -q -p no:cacheprovider tests/test_blend.py 2>&1 | tail -5
