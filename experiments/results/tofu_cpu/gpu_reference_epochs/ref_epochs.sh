# Run on the lent H200 from the repository root: .devcarry/ held (not committed) the rouge-score and nltk
# wheels, a copy of ../shared/data/tofu, and the study's runs/tofu_cpu/tokenizer and runs/tofu_cpu/init; $OUT is
# the device's output folder. Same finetune / eval overrides as the study's reference (commands.sh), epochs 25 and 50.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 JAXUNLEARN_PROGRESS_SECONDS=15
D=.devcarry
COMMON="data.benchmark=tofu data.source=$D/tofu data.forget_split=forget10 data.tokenizer=$D/tokenizer data.max_len=192 data.buckets=[64,128,192] data.prompt_format=qa train.lr=0.003 train.batch_size=32 train.weight_decay=0.01 train.warmup_epochs=1 train.seed=0 model.hf_folder=$D/init"
nvidia-smi --query-gpu=name --format=csv,noheader
for E in ${EPOCHS:-25 50}; do
  t0=$(date +%s)
  timeout 170 python3 -m jaxunlearn.cli finetune $COMMON train.epochs=$E --run /tmp/ref$E --split full > $OUT/train$E.log 2>&1
  echo "epochs=$E train rc=$? $(( $(date +%s) - t0 )) s"; tail -n 3 $OUT/train$E.log
  t0=$(date +%s)
  timeout 120 python3 -m jaxunlearn.cli eval /tmp/ref$E --which reference --max-len 192 --max-new-tokens 135 --batch-size 64 --out $OUT/eval$E > $OUT/eval$E.log 2>&1
  echo "epochs=$E eval rc=$? $(( $(date +%s) - t0 )) s"; tail -n 4 $OUT/eval$E.log
  python3 -c "import json,sys; d=json.load(open('$OUT/eval$E/reference.summary.json')); print('EPOCHS', $E, {k: round(d['forget'][k],4) for k in ('rouge','prob','exact_memorisation')}, 'retain rouge', round(d['retain']['rouge'],4), 'MU', round(d['model_utility'],4))"
done
