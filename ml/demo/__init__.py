"""The demo: generated product images (drawing), landing them as upstream would, and ``make demo``."""
