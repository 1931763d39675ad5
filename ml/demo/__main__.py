from ml.demo.run import main

raise SystemExit(main())
