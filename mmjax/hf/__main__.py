import sys

from mmjax.hf.verify import main

sys.exit(main())
