from hybrid_ext.cli import main

raise SystemExit(main())
