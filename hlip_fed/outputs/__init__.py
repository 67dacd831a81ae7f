"""What a run leaves for people: the round table, curves, TensorBoard and the HTML/Markdown report
(``report``), and the model card (``model_card``)."""
