"""Release: build the bento, check it while it serves, deploy, withdraw, roll back, audit."""
