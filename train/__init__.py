"""Training stage: store-backed loader, student, losses, trainer and export. Never imports the teacher."""
