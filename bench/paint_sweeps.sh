# The seven paint_probe.py sweeps behind docs/models.md "How a defect is painted" (issue 31).
# Run from the repository root after the three `kdad synth train` commands in docs/benchmarks.md.
set -e
P="python bench/analyses/paint_probe.py --count 16"
M="--ddpm runs/paint/mtd256 --data ../shared/data/magnetic-tile"
W="--ddpm runs/paint/weld --data ../shared/data/battery-weld/welding"
$P $M --set strength=0.1,0.2,0.3 sigma=0.5,1 grain=2,4,8 mask_sigma=0 --out bench/results/paint/mtd_depth_grain.json
$P $M --set strength=0.3,0.4 sigma=1,2 grain=8,16 mask_sigma=0 --out bench/results/paint/mtd_deeper.json
$P $M --set strength=0.1,0.3 sigma=1,2 grain=0 mask_sigma=0 --out bench/results/paint/mtd_white.json
$P --ddpm runs/paint/mtd64 --data ../shared/data/magnetic-tile --set strength=0.2,0.3 sigma=1 grain=2 mask_sigma=0 --out bench/results/paint/mtd_64px.json
$P $M --set mask_sigma=0,1,2 min_change=0.031373,0.0627 --out bench/results/paint/mtd_mask.json
$P $W --set strength=0.1,0.2,0.3,0.4 sigma=1 grain=2,8 mask_sigma=0 --out bench/results/paint/weld_depth_grain.json
$P $W --set mask_sigma=0,1,2 --out bench/results/paint/weld_mask.json
