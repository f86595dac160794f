from metarl.cli import main

raise SystemExit(main())
