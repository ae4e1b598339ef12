"""python -m mmjax.hf verify DIR ... | python -m mmjax.hf export --checkpoint WORKDIR ..."""
import sys

if len(sys.argv) > 1 and sys.argv[1] == "export":
    from mmjax.hf.export import main

    sys.exit(main(sys.argv[2:]))
from mmjax.hf.verify import main  # noqa: E402

sys.exit(main())
