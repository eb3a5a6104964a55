#!/usr/bin/env bash
# Run a docembed job from cron and log to a file. Each run embeds only what is new or changed since
# the last one (committed units are skipped; a changed file's rows are replaced), and the output lock
# makes a run that starts while the previous one is still going exit at once (code 2) instead of
# racing it. Usage: docembed-cron.sh JOB.yaml [extra flags]
set -uo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
job="${1:?usage: docembed-cron.sh JOB.yaml [flags]}"; shift
log_dir="${DOCEMBED_LOG_DIR:-$repo/logs}"
mkdir -p "$log_dir"
log="$log_dir/$(basename "$job" .yaml)-$(date -u +%Y%m%dT%H%M%SZ).log"
{
  echo "# $(date -u +%FT%TZ) docembed run --job $job $*"
  "$repo/.venv/bin/docembed" run --job "$job" --no-progress "$@"
  code=$?
  echo "# $(date -u +%FT%TZ) exit $code"
} >>"$log" 2>&1
exit "${code:-1}"
