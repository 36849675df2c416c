from simclr_kit.cli import main

raise SystemExit(main())
