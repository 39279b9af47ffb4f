"""Facts the bundled model knows: the shared material for tests, notebooks and benchmarks.

A fact is a directed triple (subject, relation, object) written as a prompt template
with ``{}`` where the subject goes (the paper's p(s, r), eq. 1). ``KNOWN_FACTS`` lists
facts for which SmolLM2-135M-Instruct (the bundled model, float32, CPU) puts the
object's first token at rank 1 after the prompt; ``p_true`` is that token's measured
probability. The list was made by scoring hand-written candidate tables (public
knowledge) with :func:`memit_lab.prompts.top_predictions` and keeping the top-1 ones;
``tests/test_facts.py`` checks that it still holds.

Example:
    >>> f = KNOWN_FACTS[0]
    >>> f.prompt, f.target
    ('The Eiffel Tower is located in the city of', 'Paris')
    >>> sorted(relations())[:3]
    ['capital', 'city_country', 'company_country']
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KNOWN_FACTS", "Fact", "facts_by_relation", "relations"]


@dataclass(frozen=True)
class Fact:
    """A subject, a relation template and the object the model should say.

    Attributes:
        template: the prompt with ``{}`` for the subject, e.g. ``"The capital of {} is"``.
        subject: the subject string, e.g. ``"France"``.
        target: the true object, e.g. ``"Paris"`` (scored with a leading space).
        relation: a short relation id shared by facts of the same template.
        p_true: the bundled model's measured probability of the target's first token.
    """

    template: str
    subject: str
    target: str
    relation: str
    p_true: float = float("nan")

    @property
    def prompt(self) -> str:
        return self.template.format(self.subject)


KNOWN_FACTS: tuple[Fact, ...] = (
    Fact("The {} is located in the city of", "Eiffel Tower", "Paris", "landmark_city", 0.702),
    Fact("The {} is located in the city of", "Louvre Museum", "Paris", "landmark_city", 0.591),
    Fact("The {} is located in the city of", "Colosseum", "Rome", "landmark_city", 0.726),
    Fact("The {} is located in the city of", "Statue of Liberty", "New York", "landmark_city", 0.719),
    Fact("The {} is located in the city of", "Golden Gate Bridge", "San Francisco", "landmark_city", 0.725),
    Fact("The {} is located in the city of", "Acropolis", "Athens", "landmark_city", 0.758),
    Fact("The {} is located in the city of", "Kremlin", "Moscow", "landmark_city", 0.444),
    Fact("The {} is located in the city of", "Taj Mahal", "Agra", "landmark_city", 0.377),
    Fact("The {} is located in the city of", "Brandenburg Gate", "Berlin", "landmark_city", 0.103),
    Fact("The {} is located in the city of", "Sagrada Familia", "Barcelona", "landmark_city", 0.229),
    Fact("The {} is located in the city of", "Leaning Tower of Pisa", "Pisa", "landmark_city", 0.39),
    Fact("The {} is located in the city of", "Sydney Opera House", "Sydney", "landmark_city", 0.971),
    Fact("{} is located in the city of", "Times Square", "New York", "landmark_city", 0.082),
    Fact("The {} is located in the city of", "Hollywood sign", "Los Angeles", "landmark_city", 0.48),
    Fact("The {} is located in the city of", "Vatican", "Rome", "landmark_city", 0.529),
    Fact("The {} is located in the city of", "Parthenon", "Athens", "landmark_city", 0.663),
    Fact("The {} is located in the city of", "Tower of London", "London", "landmark_city", 0.574),
    Fact("The {} is located in the city of", "Empire State Building", "New York", "landmark_city", 0.28),
    Fact("The {} is located in the city of", "Burj Khalifa", "Dubai", "landmark_city", 0.076),
    Fact("The capital of {} is", "France", "Paris", "capital", 0.773),
    Fact("The capital of {} is", "Germany", "Berlin", "capital", 0.796),
    Fact("The capital of {} is", "Japan", "Tokyo", "capital", 0.703),
    Fact("The capital of {} is", "China", "Beijing", "capital", 0.54),
    Fact("The capital of {} is", "Greece", "Athens", "capital", 0.66),
    Fact("The capital of {} is", "England", "London", "capital", 0.589),
    Fact("The capital of {} is", "Italy", "Rome", "capital", 0.38),
    Fact("The capital of {} is", "Spain", "Madrid", "capital", 0.377),
    Fact("The capital of {} is", "Russia", "Moscow", "capital", 0.377),
    Fact("The capital of {} is", "Canada", "Ottawa", "capital", 0.246),
    Fact("The capital of {} is", "Portugal", "Lisbon", "capital", 0.471),
    Fact("The capital of {} is", "Austria", "Vienna", "capital", 0.419),
    Fact("The capital of {} is", "Ireland", "Dublin", "capital", 0.174),
    Fact("The capital of {} is", "Norway", "Oslo", "capital", 0.212),
    Fact("The capital of {} is", "Sweden", "Stockholm", "capital", 0.472),
    Fact("The capital of {} is", "Thailand", "Bangkok", "capital", 0.371),
    Fact("The capital of {} is", "Kenya", "Nairobi", "capital", 0.454),
    Fact("The capital of {} is", "Mexico", "Mexico City", "capital", 0.475),
    Fact("The capital of {} is", "South Korea", "Seoul", "capital", 0.789),
    Fact("The capital of {} is", "Cuba", "Havana", "capital", 0.28),
    Fact("The capital of {} is", "Hungary", "Budapest", "capital", 0.565),
    Fact("The capital of {} is", "Denmark", "Copenhagen", "capital", 0.304),
    Fact("The capital of {} is", "the Netherlands", "Amsterdam", "capital", 0.634),
    Fact("{} is a car company from", "Ferrari", "Italy", "company_country", 0.436),
    Fact("{} is a car company from", "Volkswagen", "Germany", "company_country", 0.22),
    Fact("{} is a car company from", "Toyota", "Japan", "company_country", 0.505),
    Fact("{} is a car company from", "Fiat", "Italy", "company_country", 0.179),
    Fact("{} is a car company from", "Porsche", "Germany", "company_country", 0.345),
    Fact("The official language of {} is", "France", "French", "language", 0.389),
    Fact("The official language of {} is", "Germany", "German", "language", 0.364),
    Fact("The official language of {} is", "Spain", "Spanish", "language", 0.311),
    Fact("The official language of {} is", "Mexico", "Spanish", "language", 0.455),
    Fact("The official language of {} is", "Russia", "Russian", "language", 0.508),
    Fact("The official language of {} is", "Italy", "Italian", "language", 0.207),
    Fact("The official language of {} is", "Poland", "Polish", "language", 0.207),
    Fact("The official language of {} is", "Argentina", "Spanish", "language", 0.334),
    Fact("The official language of {} is", "Austria", "German", "language", 0.173),
    Fact("The official language of {} is", "Turkey", "Turkish", "language", 0.465),
    Fact("The official language of {} is", "the Netherlands", "Dutch", "language", 0.312),
    Fact("The official language of {} is", "Egypt", "Arabic", "language", 0.131),
    Fact("The official language of {} is", "Israel", "Hebrew", "language", 0.398),
    Fact("{} is located in the continent of", "Nigeria", "Africa", "continent", 0.955),
    Fact("{} is located in the continent of", "France", "Europe", "continent", 0.87),
    Fact("{} is located in the continent of", "Germany", "Europe", "continent", 0.832),
    Fact("{} is located in the continent of", "Argentina", "South America", "continent", 0.702),
    Fact("{} is located in the continent of", "Kenya", "Africa", "continent", 0.485),
    Fact("{} is located in the continent of", "Italy", "Europe", "continent", 0.87),
    Fact("{} is located in the continent of", "Spain", "Europe", "continent", 0.906),
    Fact("{} is located in the continent of", "Ghana", "Africa", "continent", 0.811),
    Fact("{} is located in the continent of", "Poland", "Europe", "continent", 0.93),
    Fact("{} is located in the continent of", "Ethiopia", "Africa", "continent", 0.934),
    Fact("{} is located in the continent of", "Norway", "Europe", "continent", 0.556),
    Fact("{} is a city in the country of", "Paris", "France", "city_country", 0.133),
    Fact("{} is a city in the country of", "Berlin", "Germany", "city_country", 0.638),
    Fact("{} is a city in the country of", "Munich", "Germany", "city_country", 0.393),
    Fact("{} is a city in the country of", "Tokyo", "Japan", "city_country", 0.387),
    Fact("{} is a city in the country of", "Osaka", "Japan", "city_country", 0.96),
    Fact("{} is a city in the country of", "Rome", "Italy", "city_country", 0.255),
    Fact("{} is a city in the country of", "Madrid", "Spain", "city_country", 0.78),
    Fact("{} is a city in the country of", "Barcelona", "Spain", "city_country", 0.622),
    Fact("{} is a city in the country of", "Lyon", "France", "city_country", 0.604),
    Fact("{} is a city in the country of", "Toronto", "Canada", "city_country", 0.795),
    Fact("{} is a city in the country of", "Sydney", "Australia", "city_country", 0.516),
    Fact("{} is a city in the country of", "Melbourne", "Australia", "city_country", 0.33),
    Fact("{} is a city in the country of", "Moscow", "Russia", "city_country", 0.932),
    Fact("{} is a city in the country of", "Cairo", "Egypt", "city_country", 0.279),
    Fact("{} is a city in the country of", "Mumbai", "India", "city_country", 0.943),
    Fact("{} is a city in the country of", "Shanghai", "China", "city_country", 0.933),
    Fact("{} is a city in the country of", "Istanbul", "Turkey", "city_country", 0.986),
    Fact("{} is a city in the country of", "Vienna", "Austria", "city_country", 0.106),
    Fact("{} is a city in the country of", "Lisbon", "Portugal", "city_country", 0.158),
    Fact("{} is a city in the country of", "Athens", "Greece", "city_country", 0.062),
    Fact("{} is a city in the country of", "Manchester", "England", "city_country", 0.377),
    Fact("{} is a city in the country of", "Hamburg", "Germany", "city_country", 0.308),
    Fact("{} is a city in the country of", "Kyoto", "Japan", "city_country", 0.993),
    Fact("{} was a famous", "Albert Einstein", "physicist", "occupation", 0.749),
    Fact("{} was a famous", "Isaac Newton", "physicist", "occupation", 0.099),
    Fact("{} was a famous", "Ludwig van Beethoven", "composer", "occupation", 0.446),
)


def relations() -> set[str]:
    """The relation ids present in :data:`KNOWN_FACTS`."""
    return {f.relation for f in KNOWN_FACTS}


def facts_by_relation(relation: str) -> list[Fact]:
    """The known facts of one relation, in table order."""
    if relation not in relations():
        raise KeyError(f"unknown relation {relation!r}; choose from {sorted(relations())}")
    return [f for f in KNOWN_FACTS if f.relation == relation]
