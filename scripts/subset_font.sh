#!/usr/bin/env bash
# Writes examples/fonts/DejaVuSans-subset.ttf, the font the examples' plots are drawn with.
# Source: DejaVuSans.ttf of Debian's fonts-dejavu-core 2.37 (apt-get install fonts-dejavu-core),
# cut down to Latin-1, Greek and a few symbols with fontTools (pip install fonttools), so the
# repository carries ~50 kB instead of ~760 kB. Licence: examples/fonts/LICENSE-DejaVu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
pyftsubset /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
  --unicodes="U+0020-007E,U+00A0-00FF,U+00B2,U+00B3,U+00D7,U+2013,U+2014,U+2018-201D,U+2026,U+2212,U+2248,U+2264,U+2265,U+03B1-03C9,U+2192" \
  --layout-features='*' --output-file=examples/fonts/DejaVuSans-subset.ttf
