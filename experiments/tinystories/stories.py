"""The embedded corpus: short children's stories generated deterministically from a seed.

When no real data set is at hand (an offline machine, a test, the Quickstart), fnlm trains on
stories written by a small grammar in the register of TinyStories: a cast of characters with
names, kinds and pronouns; places with their own details; objects with adjectives; feelings;
quoted dialogue; and one of fourteen plots, each told as setting → problem → a failed attempt →
help or an idea → resolution → a moral. Sentences are drawn from several templates with
alternatives, and the same character, object and place are carried through a story, so a small
language model has real structure to learn: agreement of pronouns with names, references back to
earlier nouns, the order of a plot, quotation marks.

The plots are data (:data:`PLOTS`): a :class:`Plot` is a list of steps, each step a tuple of
alternative sentence templates (one is told) or a small directive (:class:`Feel`, :class:`Pick`,
:class:`NeedObject`, :class:`Branch`, :class:`Tell`), and a tuple of morals. One function,
``_run``, tells them. A template fills ``{key}`` from the story's context (``{name}``, ``{He}``,
``{friend_his}``, ``{obj}``, ``{place}``, ...), picks one of ``[a|b|c]`` and draws a word for a
feeling in ``<sad>``.

Stories are separated by ``<|endoftext|>`` lines, as in TinyStoriesV2. The train and validation
splits come from two independent random streams (``stream="train"`` / ``"valid"``) of the same
grammar, so the split is fixed for a seed and neither depends on how much text is asked for:
the first ``n`` stories of a stream are always the same.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fnlm.tokenizer import ENDOFTEXT

__all__ = [
    "PLOTS", "Plot", "Feel", "Pick", "NeedObject", "Branch", "Tell",
    "generate_story", "iter_stories", "write_corpus", "corpus_paths",
]

_GIRL, _BOY = "girl", "boy"

_HUMAN_NAMES = {
    _GIRL: "Lily Mia Sara Anna Lucy Emma Zoe Ella Amy Rose Kate Sophie Maya Nora Ruby Grace Jenny Molly Daisy Sue Ava Chloe Ivy Hannah".split(),
    _BOY: "Tom Ben Max Sam Leo Jack Tim Jake Finn Noah Eli Luke Joe Bob Dan Oscar Theo Adam Henry Milo Ollie Ryan Peter Hugo".split(),
}
_HUMAN_KINDS = {_GIRL: ["girl", "girl", "little girl"], _BOY: ["boy", "boy", "little boy"]}
_ANIMALS = [
    ("cat", "Whiskers Kitty Tiger Mittens Socks Luna Coco"),
    ("dog", "Spot Rex Buddy Max Biscuit Rocky Lucky Pip"),
    ("bunny", "Fluffy Hops Snowy Clover Bun Thumper"),
    ("bird", "Tweety Chirp Sunny Pip Blue Feather"),
    ("bear", "Teddy Bruno Honey Fuzzy Barney"),
    ("fox", "Rusty Red Foxy Ginger"),
    ("frog", "Hopper Freddy Lily Ribbit Jumpy"),
    ("mouse", "Squeak Tiny Nibbles Pip Minnie"),
    ("duck", "Quacky Daisy Puddles Waddles"),
    ("owl", "Hoot Ollie Wise Luna"),
    ("turtle", "Shelly Slowpoke Tuck Myrtle"),
    ("squirrel", "Nutty Chip Acorn Bushy"),
    ("lion", "Leo Sunny Roary"),
    ("puppy", "Buddy Peanut Rolo Scout"),
    ("kitten", "Tilly Smudge Pebble Milo"),
    ("pig", "Pinky Oink Rosie Wilbur"),
    ("dragon", "Sparky Ember Blaze Puff"),
    ("robot", "Beep Bolt Zip Robo"),
]
_CHARACTER_ADJ = "little small kind happy brave curious shy friendly silly gentle clever cheerful busy playful sleepy funny quiet lively smart helpful".split()

_PARENTS = [("mom", _GIRL), ("dad", _BOY), ("grandma", _GIRL), ("grandpa", _BOY)]

_PLACES = {
    "park": ["the grass was green and soft", "children were playing on the swings", "a big tree gave cool shade", "there was a long red slide"],
    "forest": ["the trees were tall and old", "birds were singing high above", "the leaves made a soft sound", "there was a quiet path between the trees"],
    "beach": ["the sand was warm", "the waves went up and down", "the sea was blue and bright", "there were shells everywhere"],
    "garden": ["the flowers were red and yellow", "bees were buzzing around", "there were big green plants", "the air smelled sweet"],
    "farm": ["the cows were eating grass", "the barn was big and red", "the hens were clucking", "there was a muddy pond"],
    "meadow": ["the grass was tall", "butterflies flew over the flowers", "the sky was wide and blue", "a soft wind was blowing"],
    "pond": ["the water was still and clear", "ducks were swimming in a line", "frogs sat on the lily pads", "the reeds moved in the wind"],
    "hill": ["you could see the whole town", "the wind was strong", "the grass was cool", "the clouds looked very close"],
    "playground": ["the sandbox was full of toys", "kids were laughing", "the swings went high", "there was a big climbing frame"],
    "village": ["the houses were small and pretty", "people waved hello", "there was a little shop", "a bell rang in the square"],
    "river": ["the water was fast and cold", "there were smooth stones", "fish jumped out of the water", "a little bridge went over it"],
    "zoo": ["the elephants were very big", "the monkeys were jumping", "there was a long line for ice cream", "the lions were sleeping in the sun"],
}
_HOMES = ["in a small house near the woods", "in a little house with a blue door", "in a big city", "on a quiet farm", "in a cozy house by the sea", "in a tall tree", "in a small town"]


@dataclass(frozen=True)
class _Obj:
    name: str
    adjs: tuple[str, ...]
    tags: frozenset[str]


def _objs(spec: str) -> list[_Obj]:
    out = []
    for line in spec.strip().splitlines():
        name, adjs, tags = (part.strip() for part in line.split(";"))
        out.append(_Obj(name, tuple(adjs.split()), frozenset(tags.split())))
    return out


_OBJECTS = _objs(
    """
    ball; red big bouncy blue shiny; lose high play
    kite; red colorful long yellow; high break play
    hat; red funny big blue; lose high
    toy car; little red fast blue; lose break play
    teddy bear; soft brown old fluffy; lose play
    book; big old colorful new; lose break
    balloon; red blue big shiny yellow; high
    doll; pretty small old; lose break play
    toy boat; little wooden blue; lose break play
    key; shiny small golden; lose
    ring; shiny pretty golden; lose
    cup; blue little pretty; break
    drum; big loud red; break play
    scarf; warm long red soft; lose high
    shoe; new red little; lose
    crayon box; colorful new big; lose
    toy train; long wooden green; break play
    sandcastle; big tall; break
    puzzle; big hard colorful; break play
    necklace; shiny pretty; lose
    """
)

_FEEL = {
    "happy": ["happy", "very happy", "so happy", "glad", "full of joy"],
    "sad": ["sad", "very sad", "upset", "unhappy"],
    "scared": ["scared", "afraid", "a little scared", "nervous"],
    "excited": ["excited", "very excited", "so excited"],
    "proud": ["proud", "very proud"],
    "lonely": ["lonely", "all alone"],
    "worried": ["worried", "very worried"],
    "angry": ["angry", "cross", "grumpy"],
    "sorry": ["sorry", "bad", "very sorry"],
}

_HOBBIES = ["play with {his} {obj}", "run and jump", "sing songs", "draw pictures", "play outside", "look at the clouds", "read stories", "help {his} {parent}", "dance in the sun", "build things with blocks", "splash in puddles", "pick flowers"]
_TIMES = ["One day", "One sunny day", "One morning", "One afternoon", "On a bright day", "One warm day", "One cold morning", "Later that day", "The next day", "One windy day"]


_PRONOUNS = {_GIRL: ("she", "her", "her"), _BOY: ("he", "him", "his")}


@dataclass
class _Character:
    name: str
    kind: str
    gender: str


def _character(rng: random.Random, avoid: set[str]) -> _Character:
    while True:
        if rng.random() < 0.45:
            kind, names = rng.choice(_ANIMALS)
            name = rng.choice(names.split())
            gender = rng.choice([_GIRL, _BOY])
        else:
            gender = rng.choice([_GIRL, _BOY])
            name = rng.choice(_HUMAN_NAMES[gender])
            kind = rng.choice(_HUMAN_KINDS[gender])
        if name not in avoid:
            return _Character(name, kind, gender)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _person(ctx: dict[str, str], prefix: str, c: _Character) -> None:
    ctx[prefix] = c.name
    ctx[prefix.capitalize()] = c.name
    ctx[prefix + "_kind"] = c.kind
    for key, word in zip(("he", "him", "his"), _PRONOUNS[c.gender]):
        ctx[f"{prefix}_{key}"] = word
        ctx[f"{prefix}_{key.capitalize()}"] = word.capitalize()
        ctx[f"{prefix.capitalize()}_{key.capitalize()}"] = word.capitalize()


def _context(rng: random.Random) -> tuple[dict[str, str], _Obj]:
    """The story's cast, place, object and time: the keys every template may use."""
    hero = _character(rng, set())
    friend = _character(rng, {hero.name})
    parent, parent_gender = rng.choice(_PARENTS)
    obj = rng.choice(_OBJECTS)
    place = rng.choice(list(_PLACES))
    ctx: dict[str, str] = {}
    _person(ctx, "name", hero)
    _person(ctx, "friend", friend)
    he, him, his = _PRONOUNS[hero.gender]
    parent_he = _PRONOUNS[parent_gender][0]
    ctx.update(
        he=he, him=him, his=his, He=he.capitalize(), His=his.capitalize(), kind=hero.kind,
        cadj=rng.choice(_CHARACTER_ADJ), home=rng.choice(_HOMES), parent=parent, Parent=parent.capitalize(),
        parent_he=parent_he, Parent_he=parent_he.capitalize(),
        place=place, place_detail=rng.choice(_PLACES[place]), place_detail2=rng.choice(_PLACES[place]),
        obj=obj.name, oadj=rng.choice(obj.adjs), time=rng.choice(_TIMES),
    )
    ctx["a_oadj"] = _a(ctx["oadj"])
    ctx["a_cadj"] = _a(ctx["cadj"])
    ctx["hobby"] = rng.choice(_HOBBIES).format(**ctx)
    return ctx, obj


_CHOICE = re.compile(r"\[([^\[\]]*)\]")
_FEELING = re.compile(r"<(\w+)>")


class _Teller:
    """Fills templates: ``{key}`` from the story context, ``[a|b|c]`` picks one alternative,
    ``<sad>`` draws a word for a feeling."""

    def __init__(self, rng: random.Random, ctx: dict[str, str], tags: frozenset[str]):
        self.rng = rng
        self.ctx = ctx
        self.tags = tags
        self.lines: list[str] = []

    def fill(self, template: str) -> str:
        text = _CHOICE.sub(lambda m: self.rng.choice(m.group(1).split("|")), template)
        text = _FEELING.sub(lambda m: self.feel(m.group(1)), text)
        text = text.format(**self.ctx)
        return text[0].upper() + text[1:] if text else text

    def say(self, *templates: str) -> None:
        """Append one sentence, chosen among ``templates``."""
        self.lines.append(self.fill(self.rng.choice(templates)))

    def feel(self, key: str) -> str:
        return self.rng.choice(_FEEL[key])


@dataclass(frozen=True)
class Feel:
    """Step: draw a word for `feeling` (a key of ``_FEEL``: ``"sad"``, ``"happy"``, ...) into ``{key}``."""

    key: str
    feeling: str


@dataclass(frozen=True)
class Pick:
    """Step: choose one of `options` into ``{keys}``. With a tuple of keys, each option is a tuple of
    linked values, one per key (a fear, what the hero says about it, how it is overcome)."""

    keys: str | tuple[str, ...]
    options: Sequence[str] | Sequence[tuple[str, ...]]


@dataclass(frozen=True)
class NeedObject:
    """Step: if the story's object has no `tag` (``"high"``, ``"break"``, ...), draw a new ``{obj}``
    from `names` and its adjective ``{oadj}`` from `adjs`."""

    tag: str
    names: Sequence[str]
    adjs: Sequence[str]


@dataclass(frozen=True)
class Branch:
    """Step: with probability `p` tell the steps `then`, otherwise the steps `otherwise`."""

    p: float
    then: Sequence[Step]
    otherwise: Sequence[Step]


@dataclass(frozen=True)
class Tell:
    """Step: tell the template held in ``{key}`` (set by a :class:`Pick`), with no choice among alternatives."""

    key: str


Step = tuple[str, ...] | Feel | Pick | NeedObject | Branch | Tell
"""A tuple of alternative templates (one is told), or a directive."""

_OPENINGS = (
    "Once upon a time, there was a {cadj} {kind} named {name}.",
    "Once upon a time, there was a {cadj} {kind} called {name}.",
    "There once was a {cadj} {kind} named {name}.",
    "{Name} was a {cadj} {kind} who lived {home}.",
    "Once upon a time, in a land far away, there lived a {kind} named {name}.",
    "Once there was a {kind} named {name}. {He} was very {cadj}.",
)
_LIKES = (
    "{He} loved to {hobby}.",
    "{He} liked to {hobby} every day.",
    "{Name} had {a_oadj} {obj} that {he} loved very much.",
    "{His} favorite thing was {his} {oadj} {obj}.",
    "Every day, {name} liked to {hobby}.",
)
_INTRODUCE: tuple[Step, ...] = (_OPENINGS,)
_INTRODUCE_AND_LIKES: tuple[Step, ...] = (_OPENINGS, _LIKES)


@dataclass(frozen=True)
class Plot:
    """One plot of the grammar: the `opening` and the `steps` make its paragraphs, one of the `morals`
    closes it.

    - `name`: a short label.
    - `steps`: the story after the opening, told in order (see :data:`Step`).
    - `morals`: alternative closing sentences (templates).
    - `opening`: the steps that introduce the hero, before the plot.
    """

    name: str
    steps: Sequence[Step]
    morals: tuple[str, ...]
    opening: Sequence[Step] = _INTRODUCE_AND_LIKES


_AT_THE_PLACE = (
    "At the {place}, {place_detail}.",
    "It was a [nice|lovely|beautiful] day and {place_detail}.",
    "{place_detail}, and {name} felt <happy>.",
)
_GO_OUT_ALONE: list[Step] = [
    ("{time}, {name} went to the {place}.",
     "{time}, {name} walked to the {place} all by {him}self.",
     "{time}, {name} [decided|wanted] to go to the {place}."),
    _AT_THE_PLACE,
]
_GO_OUT_WITH_FRIEND: list[Step] = [
    ("{time}, {name} went to the {place} with {his} friend {friend}, a {friend_kind}.",
     "{time}, {name} and {his} friend {friend} went to the {place} to play.",
     "{time}, {name} met {his} friend {friend} the {friend_kind} at the {place}."),
    _AT_THE_PLACE,
]


_LOST = Plot(
    "lost",
    steps=[
        *_GO_OUT_ALONE,
        ("{Name} [brought|took] {his} {oadj} {obj} along.", "{Name} played with {his} {obj} for a long time."),
        ("But when it was time to go home, the {obj} was gone!",
         "After a while, {name} looked around, but {his} {obj} was not there.",
         "Then {name} put the {obj} down to [look at a butterfly|pick a flower|watch the birds], and later {he} could not find it."),
        ('"Oh no! Where is my {obj}?" {name} [cried|said|asked].',
         '"My {obj}! I lost my {obj}!" {name} [cried|shouted].'),
        Feel("f", "sad"),
        ("{Name} felt {f}.", "{Name} was {f} and wanted to cry."),
        ("{He} looked under a [rock|bush|bench|leaf], but the {obj} was not there.",
         "{He} looked [behind the tree|in the grass|near the water|under the bench], but {he} could not find it."),
        ("Then {friend} the {friend_kind} came by.",
         "Just then, {his} friend {friend} came to help.",
         "Soon {friend}, a {friend_kind}, saw {name} and asked what was wrong."),
        ('"Don\'t worry, I will help you look," said {friend}.',
         '"Let\'s look together," {friend} said.',
         '"I can help you," said {friend}. "Two friends can look better than one."'),
        ("They looked [high and low|everywhere|all around the {place}].",
         "They walked slowly and looked very carefully."),
        ("At last, {friend} found the {obj} [under a big leaf|next to a tree|in the tall grass|behind a rock].",
         "Then {friend} saw something {oadj}. It was the {obj}!",
         "Finally, {friend} [pointed and said|shouted], \"There it is!\" The {obj} was [in the grass|by the path|under the bench]."),
        Feel("f2", "happy"),
        ('{Name} was {f2}. "Thank you, {friend}!" {he} said.',
         '"Thank you so much!" said {name}. {He} gave {friend} a big hug.'),
    ],
    morals=(
        "From that day on, {name} always took good care of {his} {obj}.",
        "{Name} learned to be more careful with {his} things, and {he} was glad to have a good friend.",
        "After that, {name} kept {his} {obj} close, and {name} and {friend} played together every day.",
    ),
)

_STUCK = Plot(
    "stuck",
    steps=[
        NeedObject("high", ["kite", "ball", "balloon", "hat"], ["red", "big", "blue", "yellow"]),
        *_GO_OUT_ALONE,
        ("{Name} was playing with {his} {oadj} {obj}.", "{Name} had {his} {oadj} {obj} with {him}."),
        ("Suddenly, a big wind came, and the {obj} flew up into a tall tree.",
         "{Name} [threw|tossed] the {obj} up high, and it got stuck in a tree.",
         "The wind blew the {obj} away, and it landed on top of a [tall tree|roof|high wall]."),
        ('"Oh no! My {obj} is stuck!" said {name}.', '"How will I get my {obj} back?" {name} asked.'),
        ("{Name} jumped and jumped, but {he} was too small.",
         "{He} tried to reach it with {his} hands, but it was too high.",
         "{He} tried to climb up, but {he} slipped and fell down."),
        Feel("f", "sad"),
        ("{Name} sat down and felt {f}.", "{Name} felt {f}."),
        Branch(
            0.5,
            then=[
                ("Then {friend} the {friend_kind} came by and saw the {obj}.",
                 "Just then, {his} friend {friend} walked by."),
                ('"I have an idea," said {friend}. "Let\'s use a long stick!"',
                 '"I know what to do," said {friend}. "I will stand on the bench and you can climb on my back."'),
                ("They worked together, and soon the {obj} came down.",
                 "{Name} and {friend} tried again, and this time they got the {obj} down."),
            ],
            otherwise=[
                ("{Name}'s {parent} came to see what was wrong.", "Then {his} {parent} heard {him} and came outside."),
                ('"Let me help," said {his} {parent}. {Parent_he} got a ladder and climbed up.',
                 '"Don\'t be sad," said {his} {parent}. {Parent_he} was tall, so {parent_he} reached up and got the {obj}.'),
            ],
        ),
        Feel("f2", "happy"),
        ('{Name} was {f2} to have {his} {obj} back. "Thank you!" {he} said.',
         '"Yay!" said {name}. {He} held the {obj} tight and smiled.'),
    ],
    morals=(
        "{Name} learned that when something is hard, it is good to ask for help.",
        "From then on, {name} was careful to play with the {obj} away from the trees.",
        "{Name} learned that working together makes hard things easy.",
    ),
)

_SHARE = Plot(
    "share",
    steps=[
        *_GO_OUT_WITH_FRIEND,
        ("{Name} had {a_oadj} {obj}.", "{Name} brought {his} new {obj}. It was very {oadj}."),
        ('{Friend} looked at the {obj} and said, "Can I play with it too?"',
         '"Can I have a turn?" asked {friend}.',
         '{Friend} wanted to play with the {obj} too.'),
        ('But {name} held it tight. "No, it is mine!" {he} said.',
         '"No," said {name}. "I want to play with it by myself."'),
        Feel("f", "sad"),
        ("{Friend} felt {f} and walked away.", "{Friend} was {f}. {Friend_He} sat down under a tree."),
        ("{Name} played alone, but it was not fun anymore.", "Soon {name} felt <sorry>. Playing alone was boring."),
        ("{Name} thought about {friend}.", "{Name} looked at {friend} and felt bad inside."),
        ('{He} walked over and said, "I\'m sorry, {friend}. Do you want to play with my {obj}?"',
         '"{Friend}, let\'s play together," said {name}. "You can go first."'),
        ('{Friend} smiled. "Yes, please!"', '{Friend} was happy again. "Thank you, {name}!" {friend_he} said.'),
        ("They took turns and played all day.", "They played with the {obj} together and laughed and laughed."),
    ],
    morals=(
        "{Name} learned that sharing is more fun than playing alone.",
        "From that day on, {name} always shared {his} toys with {his} friends.",
        "Sharing made {name} and {friend} the best of friends.",
    ),
)

_SCARED = Plot(
    "scared",
    opening=_INTRODUCE,
    steps=[
        Pick(("fear", "fear_line", "fix"), [
            ("the dark", "It is so dark. I am scared of the dark.",
             "{Parent_he} turned on a little night light. It made the room soft and warm."),
            ("the thunder", "The thunder is so loud!",
             "{Parent_he} sat with {name} and told {him} that thunder is just the sound the sky makes after the lightning."),
            ("the big waves", "The waves are too big!",
             "{Parent_he} held {his} hand and they walked into the water slowly, one step at a time."),
            ("the big dog next door", "That dog is so big!",
             "{Parent_he} showed {name} how to hold out a hand gently. The dog sniffed it and wagged its tail."),
            ("the tall slide", "The slide is too high!",
             "{Parent_he} stood at the bottom and said, \"I will catch you.\""),
            ("the first day of school", "What if nobody likes me?",
             "{Parent_he} gave {him} a hug and said, \"Just be kind, and you will make friends.\""),
        ]),
        ("{Name} was afraid of {fear}.", "There was one thing {name} did not like: {fear}."),
        ("{time}, {name} had to face {fear}.", "{time}, {name} saw {fear} and did not want to go on."),
        Feel("f", "scared"),
        ('{Name} felt {f}. "{fear_line}" {he} said.', '"{fear_line}" said {name}. {He} felt {f}.'),
        ("{He} wanted to run away and hide.", "{He} hid behind {his} {parent}.", "{His} legs were shaking."),
        ('{His} {parent} said, "It\'s okay to be scared. I am here with you."',
         '"Don\'t worry," said {his} {parent}. "You are braver than you think."'),
        Tell("fix"),
        ("{Name} took a deep breath.", "{Name} closed {his} eyes and counted to three."),
        ("Slowly, {he} was not so scared anymore.",
         "Then {he} tried, and it was not so bad after all.",
         "Soon {name} was smiling."),
        Feel("f2", "proud"),
        ('"I did it!" said {name}. {He} felt {f2}.', '{Name} felt {f2}. "I am not scared anymore," {he} said.'),
    ],
    morals=(
        "{Name} learned that being brave means trying even when you are scared.",
        "From that day on, {name} was not afraid of {fear}.",
        "{Name} learned that with someone who loves you, scary things are not so scary.",
    ),
)

_BROKEN = Plot(
    "broken",
    opening=_INTRODUCE,
    steps=[
        NeedObject("break", ["toy car", "cup", "kite", "toy train", "doll"], ["little", "blue", "red", "pretty"]),
        ("{Name} loved {his} {oadj} {obj} very much.", "{Name} had {a_oadj} {obj}. It was {his} favorite."),
        ("{time}, {name} was playing with it and ran too fast.",
         "{time}, {name} was playing with {his} {obj} [near the stairs|on the table|in the kitchen]."),
        ("{He} tripped, and the {obj} fell on the floor. It broke!",
         "The {obj} slipped and fell. Crack! It was broken."),
        Feel("f", "sad"),
        ('{Name} started to cry. "My {obj} is broken!"', '"Oh no!" cried {name}. {He} felt {f}.'),
        ("{He} tried to put the pieces together, but they would not stay.",
         "{He} tried to fix it by {him}self, but it did not work."),
        ("{His} {parent} came and saw the broken {obj}.", "Then {his} {parent} came into the room."),
        ('"Don\'t cry," said {his} {parent}. "We can fix it together."',
         '"Let\'s see what we can do," said {his} {parent} with a smile.'),
        ("They got some glue and put the pieces back, one by one.",
         "{Parent_he} got tape and glue, and they worked together very carefully."),
        ("Soon the {obj} was fixed. It was not perfect, but it was still {his} {obj}.",
         "After a while, the {obj} was as good as new."),
        Feel("f2", "happy"),
        ('{Name} was {f2}. "Thank you!" {he} said and gave {his} {parent} a hug.',
         '"You are the best!" said {name}. {He} felt {f2}.'),
    ],
    morals=(
        "{Name} learned to be more careful, and that broken things can often be fixed.",
        "From that day on, {name} played gently with {his} {obj}.",
        "{Name} learned that it is okay to make mistakes.",
    ),
)

_NEW_FRIEND = Plot(
    "new_friend",
    steps=[
        *_GO_OUT_ALONE,
        Feel("f", "lonely"),
        ("{Name} had no one to play with and felt {f}.", "All the other kids were playing, but {name} was {f}."),
        ("Then {he} saw a {friend_kind} sitting alone [by a tree|near the pond|on a bench|in the grass].",
         "Then {name} saw a {friend_kind} who looked sad too."),
        ('{Name} walked over and said, "Hello! My name is {name}. What is your name?"',
         '"Hi," said {name}. "Do you want to play with me?"'),
        ('"I am {friend}," said the {friend_kind}. "I am new here, and I have no friends."',
         'The {friend_kind} looked up. "My name is {friend}. Yes, I would like that!"'),
        ("{Name} and {friend} played [tag|hide and seek|with a ball|in the sand] all afternoon.",
         "They ran, laughed and played together until the sun went down."),
        ("{Friend} was not lonely anymore, and neither was {name}.", "{Name} felt warm and happy inside."),
        ('"Will you come back tomorrow?" asked {friend}. "Yes!" said {name}.',
         '"You are my best friend," said {friend}. {Name} smiled.'),
    ],
    morals=(
        "{Name} learned that saying hello can make a new friend.",
        "From that day on, {name} and {friend} played together every day.",
        "Being kind to someone new made two friends happy.",
    ),
)

_RAIN = Plot(
    "rain",
    steps=[
        ("{time}, {name} and {his} friend {friend} wanted to have a picnic at the {place}.",
         "{Name} had a plan. {He} wanted to go to the {place} with {friend}."),
        ("They packed [sandwiches and apples|cookies and juice|a big basket of food].",
         "{Name} was <excited> and could not wait."),
        ("But then dark clouds came, and it started to rain.",
         "Suddenly, big drops of rain began to fall. Then it rained and rained."),
        Feel("f", "sad"),
        ('"Now we can\'t have our picnic," said {name}. {He} felt {f}.',
         '{Name} looked out of the window and felt {f}.'),
        ('Then {friend} had an idea. "Let\'s have a picnic inside!"',
         '"I know!" said {friend}. "We can build a fort and have the picnic under it."'),
        ("They put a blanket on the floor and ate their food.",
         "They made a fort with chairs and blankets and sat inside."),
        ("They told stories and laughed.", "It was warm and cozy, and they listened to the rain."),
        ("When the rain stopped, they saw a big rainbow in the sky.",
         "Later, the sun came out, and there was a rainbow."),
        ('"This is the best picnic ever!" said {name}.', '"Rain can be fun too," said {name} with a smile.'),
    ],
    morals=(
        "{Name} learned that a good day can happen even when plans change.",
        "From then on, {name} was not sad when it rained.",
        "With a good friend, even a rainy day is a happy day.",
    ),
)

_HURT = Plot(
    "hurt",
    steps=[
        Pick("animal", ["bird", "bunny", "puppy", "kitten", "duck", "squirrel"]),
        *_GO_OUT_ALONE,
        ("There {he} found a little {animal}. It had a hurt [leg|wing|paw].",
         "Near a bush, {name} heard a small sound. It was a little {animal}, and it was hurt."),
        Feel("f", "worried"),
        ("{Name} felt {f}. \"Poor little {animal},\" {he} said.",
         '"Are you okay?" asked {name}. The {animal} looked at {him} with big eyes.'),
        ("{He} picked it up very gently and took it home.",
         "{Name} carried the {animal} home in a [soft hat|warm scarf|little basket|small box]."),
        ("{His} {parent} helped {him} put a soft cloth around the {animal}.",
         "{Name} and {his} {parent} made a little bed for the {animal}."),
        ("Every day, {name} gave the {animal} food and water.",
         "{Name} took care of the {animal} every day. {He} gave it food and sang it songs."),
        ("Soon the {animal} was strong again.", "After many days, the {animal} felt much better."),
        ("{Name} took it back outside and let it go. The {animal} [ran|hopped|flew] away, then turned to look at {him}.",
         "It was time for the {animal} to go home. {Name} was a little sad, but also happy."),
        Feel("f2", "proud"),
        ('"Goodbye, little {animal}!" said {name}. {He} felt {f2}.', "{Name} waved goodbye. {He} felt {f2} inside."),
    ],
    morals=(
        "{Name} learned that helping others makes your heart happy.",
        "From that day on, {name} always helped animals in need.",
        "Being kind to small creatures is a good thing to do.",
    ),
)

_RACE = Plot(
    "race",
    steps=[
        *_GO_OUT_WITH_FRIEND,
        ('"Let\'s have a race to the big tree!" said {friend}.', '{Friend} said, "I bet I can run faster than you!"'),
        ('"Okay!" said {name}. "Ready, set, go!"', "{Name} said yes, and they lined up."),
        ("They ran as fast as they could.", "They ran and ran. The wind was in their faces."),
        ("{Name} was winning, but then {friend} tripped and fell.",
         "Then {friend} fell down and hurt {friend_his} knee."),
        Feel("f", "sad"),
        ('"Ouch!" cried {friend}. {Friend_He} felt {f}.', "{Friend} sat on the ground and started to cry."),
        ("{Name} could win the race, but {he} stopped.", "{Name} saw {friend} and did not keep running."),
        ('{He} ran back and said, "Are you okay? Let me help you."',
         '{He} helped {friend} get up. "Let\'s walk together," {he} said.'),
        ("They walked to the tree side by side.", "Together they reached the big tree at the same time."),
        ('"You are a good friend," said {friend}.', '"Thank you for helping me," said {friend} with a smile.'),
    ],
    morals=(
        "{Name} learned that being a good friend is better than winning.",
        "From that day on, they were the best of friends.",
        "Helping a friend is more important than winning a race.",
    ),
)

_BAKE = Plot(
    "bake",
    opening=_INTRODUCE,
    steps=[
        Pick("treat", ["cake", "cookies", "pie", "muffins", "bread"]),
        Pick("who", ["mom", "dad", "grandma", "grandpa", "big sister", "little brother"]),
        ("{time}, it was {his} {who}'s birthday.", "{time}, {name} wanted to make a surprise for {his} {who}."),
        ("{Name} wanted to bake {treat}.", '"I will make {treat}!" said {name}.'),
        ("{He} got flour, eggs, milk and sugar.", "{He} put flour and sugar in a big bowl and mixed it."),
        ("But the flour went everywhere! The kitchen was a big mess.",
         "Oops! {Name} dropped an egg on the floor.",
         "{He} mixed too fast, and the milk spilled on the table."),
        Feel("f", "worried"),
        ("{Name} felt {f}. \"Now my {who} will be upset,\" {he} said.", '"Oh no," said {name}. {He} felt {f}.'),
        ("{His} friend {friend} came to help.", "Then {his} friend {friend} knocked on the door."),
        ('"Let\'s clean up and try again," said {friend}.',
         '"We can do it together," said {friend}. "Let\'s go slowly this time."'),
        ("They cleaned the kitchen and mixed everything again, slowly and carefully.",
         "This time they read the recipe and did one step at a time."),
        ("Soon the {treat} smelled sweet and warm.", "The {treat} came out of the oven. It looked yummy!"),
        ('When {his} {who} saw the {treat}, {name} shouted, "Surprise!"',
         'They gave the {treat} to {his} {who}. "Happy birthday!" said {name}.'),
        Feel("f2", "happy"),
        ("{His} {who} was {f2} and gave them both a big hug.", "Everyone ate the {treat} and smiled."),
    ],
    morals=(
        "{Name} learned that mistakes are okay if you try again.",
        "{Name} learned that doing things slowly and carefully works best.",
        "A gift made with love is the best gift of all.",
    ),
)

_TREASURE = Plot(
    "treasure",
    steps=[
        *_GO_OUT_WITH_FRIEND,
        ("They found an old map [under a rock|in a box|in the sand|inside a book].",
         "{Friend} showed {name} a map. It had a big red X on it."),
        ('"A treasure map!" said {name}. "Let\'s find the treasure!"',
         '"Look! It is a map," said {friend}. "Maybe there is treasure!"'),
        Feel("f0", "excited"),
        ("They were {f0}.", "{Name} felt {f0}."),
        ("They walked past the [big tree|old bridge|tall rocks] and over the [hill|stream|field].",
         "They followed the map step by step."),
        ("They dug and dug, but they found only mud.", "At first they looked in the wrong place and found nothing."),
        ('"Maybe we should give up," said {friend}.', "{Friend} was tired and wanted to go home."),
        ('"Let\'s try one more time," said {name}.', '"Don\'t give up!" said {name}. "Let\'s look at the map again."'),
        ("This time they found a little box. Inside were [shiny stones|old coins|colorful shells|a note that said: friends are the real treasure].",
         "They dug one more time and found a small box full of shiny things."),
        ("They shared the treasure and laughed all the way home.", '"We found it together!" said {friend}.'),
    ],
    morals=(
        "{Name} learned that if you do not give up, you can do great things.",
        "The best treasure was the fun they had together.",
        "From that day on, {name} and {friend} went on many adventures.",
    ),
)

_SEEDS = Plot(
    "seeds",
    steps=[
        Pick("plant", ["sunflower", "tomato plant", "pumpkin", "apple tree", "rose bush", "bean plant"]),
        ("{time}, {his} {parent} gave {name} a little bag of seeds.",
         "{time}, {name} found some small seeds in an old jar."),
        ('"If you plant them and take care of them, they will grow into a {plant}," said {his} {parent}.',
         '"What will they be?" asked {name}. "A big {plant}," said {his} {parent}.'),
        ("{Name} dug a hole in the garden and put the seeds in the dirt.",
         "{Name} planted the seeds in a pot by the window."),
        ("{He} gave them water every morning.", "Every day, {he} watered the seeds and sang to them."),
        ("But nothing happened. The dirt was just dirt.",
         "After three days, {name} looked, but there was nothing there."),
        Feel("f", "angry"),
        ('{Name} felt {f}. "Why won\'t you grow?" {he} said to the seeds.',
         '"This is taking too long," said {name}. {He} felt {f}.'),
        ('{His} {parent} smiled. "Good things take time. You have to be patient."',
         'Then {friend} the {friend_kind} came by and said, "Seeds are slow. Just wait and see."'),
        ("So {name} waited, and kept giving the seeds water and sun.",
         "{Name} did not give up. {He} kept watering them, day after day."),
        ("One morning, {he} saw a tiny green leaf!", "Then, one day, a small green sprout came up out of the dirt."),
        ("The sprout grew and grew. Soon it was a tall {plant}.",
         "Week by week it got bigger, until it was a real {plant}."),
        Feel("f2", "proud"),
        ('{Name} was {f2}. "I grew it myself!" {he} said.',
         "{Name} felt {f2} every time {he} looked at {his} {plant}."),
    ],
    morals=(
        "{Name} learned that good things take time and care.",
        "From that day on, {name} loved to work in the garden.",
        "{Name} learned to be patient, just like the little seeds.",
    ),
)

_BEDTIME = Plot(
    "bedtime",
    opening=_INTRODUCE,
    steps=[
        ("One night, it was time for bed, but {name} could not sleep.",
         "That night, {name} lay in bed with {his} eyes wide open."),
        ("The moon was bright, and the house was very quiet.", "Outside the window, the stars were shining."),
        ("{He} heard a strange sound. Tap, tap, tap!", "{He} saw a big shadow on the wall."),
        Feel("f", "scared"),
        ('{Name} felt {f}. "{Parent}!" {he} called.', '{Name} pulled the blanket over {his} head. {He} felt {f}.'),
        ("{His} {parent} came in and sat on the bed.", "Soon {his} {parent} came in with a little lamp."),
        ('"Let\'s look together," said {his} {parent}. It was only a branch tapping on the window.',
         'They looked, and the shadow was only {his} {oadj} {obj} on the chair.'),
        ('{Name} laughed. "It was nothing!"', '"Oh!" said {name}, and {he} started to giggle.'),
        ("{His} {parent} told {him} a story about a [sleepy bear|little star|brave mouse|kind whale].",
         "{His} {parent} sang a soft song and gave {him} a kiss."),
        ("Soon {name}'s eyes got heavy, and {he} fell asleep.",
         "{Name} yawned, closed {his} eyes and dreamed of [the sea|flying|a big cake|the stars]."),
    ],
    morals=(
        "{Name} learned that the night is not so scary when you look closely.",
        "From then on, {name} was not afraid at bedtime.",
        "And {name} slept well all night long.",
    ),
)

_LOST_WAY = Plot(
    "lost_way",
    steps=[
        Pick("place", ["forest", "meadow", "hill", "farm"]),
        ("{time}, {name} went for a walk in the {place} with {his} friend {friend}.",
         "{time}, {name} and {friend} the {friend_kind} went to explore the {place}."),
        ("They followed a [pretty butterfly|little rabbit|shiny stream|narrow path] and went very far.",
         "They played and ran, and did not see how far they went."),
        ("When they stopped, they did not know where they were.",
         "Soon the trees all looked the same, and they could not find the way back."),
        Feel("f", "worried"),
        ('"We are lost," said {friend}. {Friend_He} felt {f}.', '"Which way is home?" asked {name}. {He} felt {f}.'),
        ("They walked one way, but it was the wrong way.", "They tried to go back, but they only went in a circle."),
        ('Then {name} had an idea. "Let\'s climb the hill and look around."',
         '{Name} remembered what {his} {parent} said: "If you get lost, stop and look for something you know."'),
        ("From the top, they saw the [red roof of the barn|big old tree|tall bell tower|little blue house].",
         "Then they saw a big tree they knew."),
        ("They walked toward it, step by step, and soon they were home.",
         "They followed the path, and at last they saw {name}'s house."),
        ('{His} {parent} gave them both a big hug. "I was so worried!" {parent_he} said.',
         "They were tired, but very happy to be home."),
    ],
    morals=(
        "{Name} learned to stay on the path and to stay calm when things go wrong.",
        "From that day on, they always told someone where they were going.",
        "{Name} and {friend} learned that thinking calmly can help you find your way.",
    ),
)

PLOTS: tuple[Plot, ...] = (
    _LOST, _STUCK, _SHARE, _SCARED, _BROKEN, _NEW_FRIEND, _RAIN, _HURT, _RACE, _BAKE, _TREASURE, _SEEDS, _BEDTIME, _LOST_WAY,
)
"""The plots, in the order a story draws them from (the order is part of the corpus: keep it)."""


_ENDINGS = ["", "", "", "And they all lived happily ever after.", "The end.", "{Name} went to bed that night with a big smile."]


def _run(t: _Teller, steps: Sequence[Step]) -> None:
    """Tell `steps` in order: the interpreter of the plots."""
    for step in steps:
        match step:
            case tuple():
                t.say(*step)
            case Feel(key, feeling):
                t.ctx[key] = t.feel(feeling)
            case Pick(str() as key, options):
                t.ctx[key] = t.rng.choice(options)
            case Pick(keys, options):
                t.ctx.update(zip(keys, t.rng.choice(options), strict=True))
            case NeedObject(tag, names, adjs):
                if tag not in t.tags:
                    t.ctx["obj"] = t.rng.choice(names)
                    t.ctx["oadj"] = t.rng.choice(adjs)
                    t.ctx["a_oadj"] = _a(t.ctx["oadj"])
            case Branch(p, then, otherwise):
                _run(t, then if t.rng.random() < p else otherwise)
            case Tell(key):
                t.lines.append(t.fill(t.ctx[key]))
            case _:
                raise AssertionError(f"not a step: {step!r}")


def _tell(rng: random.Random, plots: Sequence[Plot] = PLOTS) -> tuple[Plot, dict[str, str], str]:
    """One story: the plot drawn from `plots`, the story's final context, and the text."""
    ctx, obj = _context(rng)
    t = _Teller(rng, ctx, obj.tags)
    plot = rng.choice(plots)
    _run(t, plot.opening)
    start = len(t.lines)
    _run(t, plot.steps)
    moral = rng.choice(plot.morals)
    body = t.lines[start:]
    cut = max(2, len(body) // 2 + rng.randint(-1, 1))
    paragraphs = [" ".join(t.lines[:start]) + " " + " ".join(body[:cut]), " ".join(body[cut:])]
    closing = t.fill(moral)
    ending = rng.choice(_ENDINGS)
    if ending:
        closing += " " + t.fill(ending)
    paragraphs.append(closing)
    return plot, ctx, "\n\n".join(p.strip() for p in paragraphs if p.strip())


def generate_story(rng: random.Random) -> str:
    """One story drawn from the grammar, using (and advancing) ``rng``.

    **Arguments:**

    - `rng`: a ``random.Random``; the story is a function of its state.

    **Returns:** the story text: two or three paragraphs, no separator.
    """
    return _tell(rng)[2]


def iter_stories(seed: int = 0, stream: str = "train") -> Iterator[str]:
    """The endless, deterministic sequence of stories of one stream.

    **Arguments:**

    - `seed`: the corpus seed.
    - `stream`: ``"train"`` or ``"valid"``; the two streams are independent.

    **Returns:** an iterator of stories; the first ``n`` are the same for any later use.
    """
    if stream not in ("train", "valid"):
        raise ValueError(f"stream must be 'train' or 'valid', got {stream!r}")
    rng = random.Random(f"fnlm-stories/{stream}/{seed}")
    while True:
        yield generate_story(rng)


def corpus_paths(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """The ``(train, valid)`` file paths :func:`write_corpus` uses in ``out_dir``."""
    out = Path(out_dir)
    return out / "stories-train.txt", out / "stories-valid.txt"


def _write(path: Path, stories: Iterator[str], target_bytes: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        while written < target_bytes:
            doc = next(stories) + "\n" + ENDOFTEXT + "\n"
            f.write(doc)
            written += len(doc.encode("utf-8"))
    os.replace(tmp, path)


def write_corpus(out_dir: str | os.PathLike, train_bytes: int, valid_bytes: int, *, seed: int = 0) -> tuple[Path, Path]:
    """Write the embedded corpus: ``stories-train.txt`` and ``stories-valid.txt`` in ``out_dir``.

    Each file holds whole stories, each followed by a ``<|endoftext|>`` line, until it reaches at
    least the requested size. Files are written to a temporary name and renamed, so a file that
    exists is complete.

    **Arguments:**

    - `out_dir`: folder to write into (created if needed).
    - `train_bytes`, `valid_bytes`: minimum sizes of the two files, in bytes (> 0).
    - `seed`: corpus seed; the same seed and sizes give byte-identical files.

    **Returns:** ``(train_path, valid_path)``.
    """
    if train_bytes <= 0 or valid_bytes <= 0:
        raise ValueError(f"sizes must be positive, got train_bytes={train_bytes}, valid_bytes={valid_bytes}")
    train_path, valid_path = corpus_paths(out_dir)
    train_path.parent.mkdir(parents=True, exist_ok=True)
    _write(train_path, iter_stories(seed, "train"), train_bytes)
    _write(valid_path, iter_stories(seed, "valid"), valid_bytes)
    return train_path, valid_path
