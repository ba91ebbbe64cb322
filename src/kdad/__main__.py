from kdad.cli import main

raise SystemExit(main())
