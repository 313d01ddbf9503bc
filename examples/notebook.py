"""hpsearch from a notebook: submit a study, wait for it, read the leaderboard as a DataFrame,
and predict with the best model on raw rows of the original table.

Run from the repository root while workers serve the database (`hpsearch worker`):

    python examples/notebook.py http://127.0.0.1:8000   # through the REST API (`hpsearch serve`)
    python examples/notebook.py sqlite:///hpsearch.db   # or straight over the database

Each `# %%` cell runs as it is in Jupyter or VS Code.
"""

# %%
import sys

import numpy as np
import pandas as pd
import yaml

import hpsearch

url = sys.argv[1] if len(sys.argv) > 1 else "sqlite:///hpsearch.db"
client = hpsearch.Client(url)  # a token: Client(url, token=...) or $HPSEARCH_API_TOKEN

# %% Submit the study: a dict here; a YAML path or a StudySpec do as well.
with open("examples/flowers-csv.yaml") as file:
    spec = yaml.safe_load(file)
study = client.submit(spec)

# %% Wait until the workers have spent its budget.
status = study.wait(timeout_s=1800, progress=True)
done, budget = status.progress.finished, status.progress.budget
print(f"{study.name}: {status.state}, {done} of {budget} trials")

# %% The leaderboard, as a DataFrame indexed by rank.
board = study.leaderboard_frame(top=5)
print(board[["number", "value", "learning_rate", "batch_size", "activation", "test_accuracy"]])
importance = study.importance()  # which hyperparameters mattered (PED-ANOVA)
print(importance.reason or {i.param: round(i.importance, 2) for i in importance.importances})

# %% The best model predicts on raw rows: text columns and labels as the CSV holds them.
model = study.best_model()
table = pd.read_csv("examples/data/flowers.csv")
test = model.test_rows(table)  # the rows training held out, where test_accuracy was measured
predicted = model.predict(test)
accuracy = np.float32((predicted == test["species"].to_numpy()).mean())
stored = np.float32(model.metrics["test_accuracy"])
verdict = "matches" if accuracy == stored else "DIFFERS FROM"
print(f"trial {model.trial}: accuracy {accuracy:.4f} on raw rows {verdict} the stored {stored:.4f}")
print(pd.DataFrame({"species": test["species"], "predicted": predicted}).head())
