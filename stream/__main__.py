from stream.cli import app

app()
