"""python -m mmjax.hf verify DIR ... | python -m mmjax.hf export --checkpoint WORKDIR ..."""
import sys

from mmjax import export
from mmjax.hf import verify

if len(sys.argv) > 1 and sys.argv[1] == "export":
    sys.exit(export.main(sys.argv[2:]))
sys.exit(verify.main())
